"""Moving calls and data between processes: transport, codec, data planes."""
