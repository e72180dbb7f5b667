"""int8 weights for a decoder generating on the CPU, applied at load time (checkpoints stay float).

    decoder = quantize_decoder(model.decoder, "int8")

"int8" is PyTorch's dynamic quantization (torch.ao.quantization.quantize_dynamic, with fbgemm's
or oneDNN's kernels): every linear layer of the decoder, the LM head included, keeps its weights
as int8 with one scale per output row, and the activations are quantized on the fly, so a token
reads a quarter of the weight bytes, which is what bounds decoding on a CPU.
docs/quantization.md says what else was measured (torchao, optimum-quanto) and why this one.
"""
import warnings

import torch
import torch.nn as nn

from cli import UserError

METHODS = ["int8"]


def quantize_decoder(decoder: nn.Module, method: str) -> nn.Module:
    """The decoder (any transformers causal LM, possibly wrapped by peft) with its linear layers
    quantized; the returned module replaces the given one, which is changed in place and must not
    be used any more. The input embedding stays float, even when the LM head shares its weight:
    the image prefix lives in that space, and the head gets an int8 copy of its own."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose one of {METHODS}")
    weight = decoder.get_input_embeddings().weight
    if weight.device.type != "cpu":  # these kernels exist for the CPU only
        raise UserError(f"--quantize {method} is for generating on the CPU, and the model is on "
                        f"{weight.device.type}; add --device cpu, or leave out --quantize (on a GPU, "
                        f"--dtype bfloat16 halves the memory)")
    if weight.dtype != torch.float32:
        raise UserError(f"--quantize {method} makes int8 weights from float32 ones, and the model is "
                        f"{str(weight.dtype).removeprefix('torch.')}; leave out --dtype")
    if hasattr(decoder, "merge_and_unload"):  # peft: fold the LoRA adapters into the weights first
        decoder = decoder.merge_and_unload()
    conv1d_to_linear(decoder)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    # torch.ao.quantization is deprecated in favour of torchao, whose CPU path measured slower here
    # without torch.compile (docs/quantization.md); its deprecation warning is not the user's to act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # inplace: a copy would hold a second float model. Each new layer packs its own int8
        # weight, so a tied input embedding keeps the float one and the head parts ways with it.
        quantize_dynamic(decoder, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    return decoder


def conv1d_to_linear(module: nn.Module) -> None:
    """Replaces transformers' Conv1D layers (GPT-2's: y = x @ W + b, W of shape (in, out)) by the
    nn.Linear they are, with W transposed, so that quantize_dynamic finds them."""
    from transformers.pytorch_utils import Conv1D
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = nn.Linear(n_in, n_out, device="meta")  # no throw-away initialisation
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(parent, name, linear)
