"""A preload that 'initialises CUDA': a stand-in torch whose cuda says so."""
import sys
import types

torch = types.ModuleType("torch")
torch.cuda = types.SimpleNamespace(is_initialized=lambda: True)
sys.modules["torch"] = torch
