"""One module per op family: the backend implementations it registers and its autograd custom
ops. engine.functional is the public entry; importing this package registers everything."""
from engine.ops import attention, common, cross_entropy, layer_norm, linear, rotary  # noqa: F401
