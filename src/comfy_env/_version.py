__version__ = "0.5.0"
# Bumped whenever the framing or the message tuples change; parent and worker must agree.
PROTOCOL_VERSION = 2
