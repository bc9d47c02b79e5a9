"""EdgeSpec device client: drafts token trees and streams the server's verdicts. No torch."""
