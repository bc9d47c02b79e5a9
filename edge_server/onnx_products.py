"""One-thread onnxruntime sessions over weights the caller already holds, so products run on
MLAS (which packs the weights once at load) without a serialized copy of them.

The weights are handed over as external initializers read in place: the session keeps them
alive. One thread: a session has no thread pool of its own to compete with torch's, and it runs
on the caller's thread, the model's.
"""
from __future__ import annotations

import numpy as np


def one_thread_session(nodes: list, inputs: list, outputs: list, weights: dict[str, np.ndarray],
                       constants: tuple = ()):
    """An InferenceSession over one graph of `nodes`; `weights` name the graph's large
    initializers (read in place), `constants` are small TensorProtos stored in the graph."""
    import onnxruntime as ort
    from onnx import helper

    initializers = [_supplied_at_load(name, array) for name, array in weights.items()]
    graph = helper.make_graph(nodes, "products", inputs, outputs, [*initializers, *constants])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in weights.items()}
    options.add_external_initializers(list(values), list(values.values()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.weights = values  # the session reads this memory for as long as it lives
    return session


def _supplied_at_load(name: str, array: np.ndarray):
    from onnx import TensorProto, helper

    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                         data_location=TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value="supplied-at-load")
    return tensor
