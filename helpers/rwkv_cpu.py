"""Make bigdl-llm's low-bit RWKV-4 run on a CPU.

What upstream ships (bigdl-llm 2.5.0b20240627) and why it fails on a CPU:
- ``optimize_model=True`` (the default) rescales the layers, converts the linears to INT4, then
  replaces ``RwkvSelfAttention.forward`` and ``RwkvFeedForward.forward`` with versions that
  ``import linear_q4_0``, an Intel-GPU-only module: ModuleNotFoundError on the first forward.
- ``optimize_model=False`` leaves the layers unrescaled, so transformers' first forward divides the
  INT4 weights in place ("result type Float can't be cast to ... Byte").

``repair_for_cpu`` binds CPU forwards that keep bigdl's low-bit linears (and its layer rescale),
applies the rescale to the outputs where the weights were not rescaled, and turns the fp16 mixing
vectors into fp32 copies, which frees the memory-mapped checkpoint they were views into.
"""
import ctypes
import gc
import sys

import torch
from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu


def _previous_hidden(module, hidden, state, slot):
    """Each position's previous hidden vector; the first position's comes from the state."""
    if hidden.size(1) == 1 and state is not None:
        return state[slot][:, :, module.layer_id].unsqueeze(1)
    shifted = torch.nn.functional.pad(hidden, (0, 0, 1, -1))
    if state is not None:
        shifted[:, 0] = state[slot][:, :, module.layer_id]
    return shifted


def _mix(hidden, shifted, weight):
    return hidden * weight + shifted * (1 - weight)


def attention_forward(self, hidden, state=None, use_cache=False):
    """RWKV-4 time mixing (same maths as transformers' RwkvSelfAttention), low-bit linears on CPU."""
    shifted = _previous_hidden(self, hidden, state, 1)
    key = self.key(_mix(hidden, shifted, self.time_mix_key))
    value = self.value(_mix(hidden, shifted, self.time_mix_value))
    receptance = torch.sigmoid(self.receptance(_mix(hidden, shifted, self.time_mix_receptance)))
    if state is not None:
        state[1][:, :, self.layer_id] = hidden[:, -1]
    layer_state = tuple(s[:, :, self.layer_id] for s in state[2:]) if state is not None else None
    wkv, layer_state = rwkv_linear_attention_cpu(
        self.time_decay, self.time_first, key, value, state=layer_state, return_state=use_cache
    )
    if layer_state is not None:
        for slot, value in zip((2, 3, 4), layer_state):
            state[slot][:, :, self.layer_id] = value
    return self.output(receptance * wkv) * self.output_scale, state


def feed_forward_forward(self, hidden, state=None):
    """RWKV-4 channel mixing (same maths as transformers' RwkvFeedForward), low-bit linears on CPU."""
    shifted = _previous_hidden(self, hidden, state, 0)
    key = torch.square(torch.relu(self.key(_mix(hidden, shifted, self.time_mix_key))))
    receptance = torch.sigmoid(self.receptance(_mix(hidden, shifted, self.time_mix_receptance)))
    if state is not None:
        state[0][:, :, self.layer_id] = hidden[:, -1]
    return receptance * self.value(key) * self.output_scale, state


def _own_parameters_to_fp32(module):
    """Replace the module's own parameters (not its children's) by fp32 copies."""
    for name, param in list(module.named_parameters(recurse=False)):
        module._parameters[name] = torch.nn.Parameter(param.detach().to(torch.float32, copy=True), requires_grad=False)


def release_freed_memory():
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def is_low_bit(model):
    from bigdl.llm.transformers.low_bit_linear import LowBitLinear

    return any(isinstance(module, LowBitLinear) for module in model.modules())


def repair_for_cpu(model):
    """Make a bigdl-converted RWKV-4 model (any of its loading APIs) run correctly on CPU. Returns it."""
    rwkv = model.rwkv
    every = model.config.rescale_every
    # Weights already rescaled (optimize_model=True) need no scale; otherwise scale the outputs,
    # which equals dividing the weights and leaves the INT4 weights untouched.
    weights_rescaled = rwkv.layers_are_rescaled
    for layer, block in enumerate(rwkv.blocks):
        scale = 1.0 if weights_rescaled or every <= 0 else 2.0 ** -(layer // every)
        for module, forward in ((block.attention, attention_forward), (block.feed_forward, feed_forward_forward)):
            module.forward = forward.__get__(module, type(module))
            module.output_scale = scale
            _own_parameters_to_fp32(module)
    rwkv.layers_are_rescaled = True
    model.eval()
    release_freed_memory()
    return model
