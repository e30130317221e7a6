"""The operator tools: the command line, its status report, and the demo."""
