"""EdgeSpec edge server: verifies device-drafted token trees with the target model."""
__version__ = "0.1.0"
