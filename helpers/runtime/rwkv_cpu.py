"""Make the low-bit RWKV-4 of bigdl-llm (or its successor ipex-llm) run on a CPU, and run fast there.

What upstream ships (bigdl-llm 2.5.0b20240627, ipex-llm 2.2.0) and why it fails on a CPU:
- ``optimize_model=True`` (the default) rescales the layers, converts the linears to INT4, then
  replaces ``RwkvSelfAttention.forward`` and ``RwkvFeedForward.forward`` with versions that
  import ``linear_q4_0`` (bigdl-llm) or ``xe_linear`` (ipex-llm), Intel-GPU-only modules:
  ModuleNotFoundError on the first forward.
- ``optimize_model=False`` leaves the layers unrescaled, so transformers' first forward divides the
  INT4 weights in place ("result type Float can't be cast to ... Byte").

``repair_for_cpu`` binds CPU forwards that keep the library's low-bit linears (and its layer rescale),
applies the rescale to the outputs where the weights were not rescaled, and turns the fp16 mixing
vectors into fp32 copies, which frees the memory-mapped checkpoint they were views into. The
embedding table, which the library widens to fp32, goes back to the checkpoint's fp16.

The forwards compute the same maths as transformers' RwkvSelfAttention / RwkvFeedForward with
fewer tensor operations: one batched mix for key / value / receptance, the decay exponent computed
once, and for a single token (decoding) the library's INT4 kernel called directly. Under generate() the
head runs on the last position only, and a padded batch of prompts is read row by row, so that
pads never enter a state. Where ``model.fused_forward`` is set (helpers.runtime.fused_decode's
``use_fused_step``), token ids (a prompt, a decoding step, or one step of a batch of sequences) run in
that one native call instead.

This file imports nothing else of the project: copy it beside a script of your own.
"""
import ctypes
import gc
import sys

import torch
from transformers.models.rwkv.modeling_rwkv import RwkvCausalLMOutput

# The running maximum before any token: exp() of anything minus it is 0, so the first token alone counts
# (transformers' value).
NO_MAXIMUM = -1e30


def _linear(module, x):
    """module(x); a single token calls the library's INT4 kernel without LowBitLinear's per-call checks."""
    if x.shape[0] * x.shape[1] == 1 and hasattr(module, "qtype"):
        # the low_bit_linear module of the library that made the model (bigdl.llm's or ipex_llm's)
        ggml_matmul_src1_x_src0_t = sys.modules[type(module).__module__].ggml_matmul_src1_x_src0_t
        out = ggml_matmul_src1_x_src0_t(module.weight.data, x.reshape(1, -1), module.weight_shape, module.qtype)
        return out.view(1, 1, -1)
    return module(x)


def _mixed_inputs(module, hidden, state, slot):
    """Interpolate each position with the previous one, for all of the module's linears at once.

    Returns a tensor [n_mixes, batch, seq, hidden]; the first position's previous hidden vector
    comes from the state, and the state keeps the last position for the next call.
    """
    if hidden.size(1) == 1 and state is not None:
        shifted = state[slot][:, :, module.layer_id].unsqueeze(1)
    else:
        shifted = torch.nn.functional.pad(hidden, (0, 0, 1, -1))
        if state is not None:
            shifted[:, 0] = state[slot][:, :, module.layer_id]
    mixed = torch.addcmul(shifted, hidden - shifted, module.time_mixes)
    if state is not None:
        state[slot][:, :, module.layer_id] = hidden[:, -1]
    return mixed


def wkv_recurrence(module, key, value, layer_state=None):
    """The WKV recurrence over the positions of key / value, continuing layer_state (num, den, max_state),
    or from the start of a text when it is None; returns (output, (num, den, max_state))."""
    if layer_state is None:
        zeros = torch.zeros_like(key[:, 0])
        layer_state = (zeros, zeros, torch.full_like(zeros, NO_MAXIMUM))
    num, den, max_state = layer_state
    output = torch.empty_like(key)
    for position in range(key.shape[1]):
        k, v = key[:, position], value[:, position]
        with_bonus = module.time_first + k
        top = torch.maximum(max_state, with_bonus)
        e1, e2 = torch.exp(max_state - top), torch.exp(with_bonus - top)
        output[:, position] = torch.addcmul(e2 * v, e1, num) / torch.addcmul(e2, e1, den)
        decayed = max_state + module.decay
        top = torch.maximum(decayed, k)
        e1, e2 = torch.exp(decayed - top), torch.exp(k - top)
        num, den, max_state = torch.addcmul(e2 * v, e1, num), torch.addcmul(e2, e1, den), top
    return output, (num, den, max_state)


def attention_forward(self, hidden, state=None, use_cache=False):
    """RWKV-4 time mixing on CPU."""
    mixed = _mixed_inputs(self, hidden, state, 1)
    key, value = _linear(self.key, mixed[0]), _linear(self.value, mixed[1])
    receptance = torch.sigmoid(_linear(self.receptance, mixed[2]))
    layer_state = None if state is None else [s[:, :, self.layer_id] for s in state[2:]]
    wkv, layer_state = wkv_recurrence(self, key, value, layer_state)
    if state is not None:
        for slot, tensor in zip((2, 3, 4), layer_state):
            state[slot][:, :, self.layer_id] = tensor
    out = _linear(self.output, receptance * wkv)
    return (out if self.output_scale == 1 else out * self.output_scale), state


def feed_forward_forward(self, hidden, state=None):
    """RWKV-4 channel mixing on CPU."""
    mixed = _mixed_inputs(self, hidden, state, 0)
    key = torch.relu(_linear(self.key, mixed[0]))
    receptance = torch.sigmoid(_linear(self.receptance, mixed[1]))
    out = receptance * _linear(self.value, key * key)
    return (out if self.output_scale == 1 else out * self.output_scale), state


def prepare_inputs_for_generation(self, input_ids, state=None, attention_mask=None, **kwargs):
    """transformers' own, plus the prompts' attention mask (padding) and a marker that the call comes
    from generate()."""
    inputs = type(self).prepare_inputs_for_generation(self, input_ids, state=state, **kwargs)
    if state is None:
        inputs["attention_mask"] = attention_mask
    return {**inputs, "last_logits_only": True}


def _read_padded_prompts(model, input_ids, attention_mask, last_logits_only):
    """A padded batch of prompts (``tokenizer(prompts, padding=True)``): RWKV has no attention to mask,
    so each row's own tokens are read apart and no pad enters a state; the rows' states are then
    joined, and generate() decodes them together, one token of each per step."""
    outputs = []
    for ids, mask in zip(input_ids, attention_mask.bool()):
        if not mask.any():
            raise ValueError("every prompt of the batch needs at least one token")
        outputs.append(model(ids[mask].unsqueeze(0), use_cache=True, last_logits_only=last_logits_only))
    state = [torch.cat([output.state[k] for output in outputs]) for k in range(5)]
    if last_logits_only:
        return RwkvCausalLMOutput(logits=torch.cat([output.logits for output in outputs]), state=state)
    logits = torch.zeros(*input_ids.shape, outputs[0].logits.shape[-1])  # pads' positions stay zero
    for row, (mask, output) in enumerate(zip(attention_mask.bool(), outputs)):
        logits[row, mask] = output.logits[0]
    return RwkvCausalLMOutput(logits=logits, state=state)


def causal_lm_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, state=None, use_cache=None,
                      last_logits_only=False, **kwargs):
    """Token ids run in one native call where the model allows it, each row a sequence with its own
    state (a batch decodes together). Under generate(), which reads only the last position's logits,
    the head (65536 rows) runs for that position alone."""
    if state is None and attention_mask is not None and input_ids is not None and not attention_mask.bool().all():
        return _read_padded_prompts(self, input_ids, attention_mask, last_logits_only)
    fused = getattr(self, "fused_forward", None)
    plain_output = not (kwargs.get("output_attentions") or kwargs.get("output_hidden_states")
                        or kwargs.get("return_dict") is False)
    if fused is not None and inputs_embeds is None and plain_output and fused.can_run(input_ids, state):
        logits, state = fused(input_ids, state, all_logits=not last_logits_only)
        return RwkvCausalLMOutput(logits=logits, state=state)
    if not last_logits_only:
        return type(self).forward(self, input_ids, attention_mask, inputs_embeds, state, use_cache=use_cache, **kwargs)
    out = self.rwkv(input_ids, inputs_embeds=inputs_embeds, state=state, use_cache=use_cache, return_dict=True)
    return RwkvCausalLMOutput(logits=self.head(out.last_hidden_state[:, -1:]), state=out.state)


class HalfEmbedding(torch.nn.Module):
    """The token embedding table kept in fp16, half of the library's fp32 copy; looked-up rows are fp32.

    An fp16 table (a mapped low-bit cache) is kept as it is, not copied."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().to(torch.float16), requires_grad=False)

    def forward(self, input_ids):
        return torch.nn.functional.embedding(input_ids, self.weight).float()


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


def repair_for_cpu(model):
    """Make an RWKV-4 model that bigdl-llm or ipex-llm converted (any of its loading APIs) run correctly on CPU.
    Returns it."""
    rwkv = model.rwkv
    if not isinstance(rwkv.embeddings, HalfEmbedding):
        rwkv.embeddings = HalfEmbedding(rwkv.embeddings.weight)
    # Everything but the low-bit linears and the embeddings computes in fp32, whichever API loaded it
    # (load_low_bit leaves the norms in the checkpoint's fp16).
    for module in model.modules():
        if not (hasattr(module, "qtype") or isinstance(module, HalfEmbedding)):  # a LowBitLinear has a qtype
            _own_parameters_to_fp32(module)
    # ipex-llm's head (its "lm_head") would keep only the last position of a prompt over 10 tokens.
    model.head.optimize_lm_head = False
    every = model.config.rescale_every
    # Weights already rescaled (optimize_model=True) need no scale; otherwise scale the outputs,
    # which equals dividing the weights and leaves the INT4 weights untouched.
    weights_rescaled = rwkv.layers_are_rescaled
    for layer, block in enumerate(rwkv.blocks):
        attention, feed_forward = block.attention, block.feed_forward
        for module in (attention, feed_forward):
            module.output_scale = 1.0 if weights_rescaled or every <= 0 else 2.0 ** -(layer // every)
        attention.time_mixes = torch.stack(
            [attention.time_mix_key, attention.time_mix_value, attention.time_mix_receptance]
        )
        attention.decay = -torch.exp(attention.time_decay)
        feed_forward.time_mixes = torch.stack([feed_forward.time_mix_key, feed_forward.time_mix_receptance])
        attention.forward = attention_forward.__get__(attention, type(attention))
        feed_forward.forward = feed_forward_forward.__get__(feed_forward, type(feed_forward))
    rwkv.layers_are_rescaled = True
    model.prepare_inputs_for_generation = prepare_inputs_for_generation.__get__(model, type(model))
    model.forward = causal_lm_forward.__get__(model, type(model))
    model.eval()
    release_freed_memory()
    return model
