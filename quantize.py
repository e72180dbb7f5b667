"""int8 weights for a decoder generating on the CPU, applied at load time (checkpoints stay float).

    decoder = quantize_decoder(model.decoder, "int8")

"int8" is torchao's Int8DynamicActivationInt8WeightConfig: every linear layer of the decoder (the
LM head included) keeps its weights as int8 with one scale per output row, and each activation row
is quantized to int8 on the fly, so the matmul runs on the CPU's int8 instructions (VNNI, AMX).
A token then reads a quarter of the weight bytes, which is what bounds decoding on a CPU.
docs/quantization.md says what else was measured and why this one was chosen.
"""
import logging
import warnings

import torch
import torch.nn as nn

from utils import UserError

METHODS = ["int8"]


def quantize_decoder(decoder: nn.Module, method: str) -> nn.Module:
    """The decoder (any transformers causal LM, possibly wrapped by peft) with its linear layers
    quantized; the returned module replaces the given one, which is changed in place and must not
    be used any more. The input embedding stays float, even when the LM head shares its weight:
    the image prefix lives in that space, and the head gets an int8 copy of its own."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose one of {METHODS}")
    weight = decoder.get_input_embeddings().weight
    if weight.device.type != "cpu":
        # torchao has int8 kernels for CUDA too, but this path was only measured on CPUs, where it pays.
        raise UserError(f"--quantize {method} is for generating on the CPU, and the model is on "
                        f"{weight.device.type}; add --device cpu, or leave out --quantize (on a GPU, "
                        f"--dtype bfloat16 halves the memory)")
    if weight.dtype != torch.float32:
        raise UserError(f"--quantize {method} makes int8 weights from float32 ones, and the model is "
                        f"{str(weight.dtype).removeprefix('torch.')}; leave out --dtype")
    quantize_ = _torchao()  # before anything changes: a missing torchao leaves the decoder as it was
    if hasattr(decoder, "merge_and_unload"):  # peft: fold the LoRA adapters into the weights first
        decoder = decoder.merge_and_unload()
    conv1d_to_linear(decoder)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.utils import should_reduce_range
    # reduce_range: 7-bit activations, so CPUs without VNNI cannot overflow their 16-bit sums.
    # set_inductor_config=False: nothing is compiled here, and torchao would change global settings.
    config = Int8DynamicActivationInt8WeightConfig(reduce_range=should_reduce_range(weight.device),
                                                   set_inductor_config=False)
    # quantize_ gives each nn.Linear a new int8 weight Parameter; a tied input embedding keeps
    # the old float one, so the head and the embedding part ways here.
    quantize_(decoder, config)
    return decoder


def conv1d_to_linear(module: nn.Module) -> None:
    """Replaces transformers' Conv1D layers (GPT-2's: y = x @ W + b, W of shape (in, out)) by the
    nn.Linear they are, with W transposed, so libraries that quantize nn.Linear find them."""
    from transformers.pytorch_utils import Conv1D
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = nn.Linear(n_in, n_out, device="meta")  # no throw-away initialisation
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(parent, name, linear)


def _torchao():
    """torchao's quantize_, imported only when asked for (it takes seconds), without the warnings
    its import logs (about Triton, and torch.compile's handling of enums), which concern nobody here."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import quantize_
    except ImportError:
        raise UserError("--quantize int8 needs torchao: pip install -r requirements.txt") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return quantize_
