"""int8 weights for a decoder generating on the CPU, applied at load time (checkpoints stay float).

    decoder = quantize_decoder(model.decoder, "int8", calibration=token_ids)

"int8" is W8A8 with SmoothQuant's smoothing (Xiao et al., 2023): every linear layer of the decoder,
the LM head included, keeps its weights as int8 with one scale per output row, and rounds its input
to int8 on the fly with one scale per token. A real LM's activations have a few channels hundreds
of times larger than the rest, which one scale per tensor (PyTorch's dynamic quantization, this
file's method before) rounds everything else away with: SmoothQuant divides each input channel by
s = max|x|^alpha / max|w|^(1 - alpha), measured on calibration text, and multiplies the weight's
column by the same s, which leaves x @ W.T unchanged in float and evens out what int8 must hold.
docs/quantization.md has the measurements (SmolLM2, GPT-2, the candidates not chosen).
"""
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

from cli import UserError
from model import decoder_sizes

METHODS = ["int8"]
# SmoothQuant's migration strength: 0.5 gave the lowest loss on SmolLM2 of 0.35-0.85 (docs/quantization.md).
ALPHA = 0.5
# Any plain English will do: it is only read for the size of each channel of each layer's input,
# which in a trained LM depends on the channel far more than on the text.
CALIBRATION = (
    "Once upon a time, a small fox lived at the edge of a quiet forest. Every morning she walked down to "
    "the river to drink, and every morning the old heron told her the news of the valley. One day the heron "
    "said that a storm was coming over the hills. The fox ran home, gathered berries and dry leaves, and "
    "helped the rabbits close their burrows. That night the wind howled and the rain fell for hours. In the "
    "morning the sun came out, the grass shone, and all the animals came to thank her. The city woke up slowly. "
    "A baker opened his shop on the corner, a boy rode his red bicycle past the fountain, and two old friends "
    "sat on a bench to watch the boats on the lake. Far away, a rocket stood on its launch pad under a clear "
    "blue sky, ready to carry a brave astronaut to the stars.")


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights (one scale per output row) and int8 inputs (one scale per row,
    i.e. per token), after SmoothQuant's per-channel smoothing. Inference only.

    Two kernels, close numbers (int8's rounding apart): for a single row (decoding one story, a token
    at a time) fbgemm's or oneDNN's dynamic linear (torch.ops.quantized), whose one activation scale
    per call is then that token's own and which measured 1.6x (2.8x for the LM head) faster than the
    other; for several rows (the prefix, a batch of stories) torch._int_mm on int8 rows, each with its
    own scale, because one scale per call would let a single loud token drown out the others."""

    def __init__(self, linear: nn.Linear, input_max: torch.Tensor | None, alpha: float = ALPHA):
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        smooth = torch.ones(weight.shape[1])
        if input_max is not None:
            smooth = input_max.clamp_min(1e-5) ** alpha / weight.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)
            smooth = smooth.clamp(1e-3, 1e3)  # a dead channel must not blow up its weight column
        weight = weight * smooth  # a new tensor, so the in-place steps below leave the layer's own alone
        scale = weight.abs().amax(1).clamp_min(1e-8) / 127  # (out,)
        qweight = weight.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.register_buffer("inv_smooth", (1 / smooth).contiguous())
        # (in, out), _int_mm's layout: a transposed view of qweight measured as fast on SmolLM2's
        # layers but 15% slower for 16 GPT-2 stories batched (bench.py section 5b).
        self.register_buffer("weight_t", qweight.t().contiguous())
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # Quantized tensors are deprecated (a UserWarning, which quantize_decoder silences); their
        # kernels are what is fast here.
        q = torch._make_per_channel_quantized_tensor(qweight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        self._packed = torch.ops.quantized.linear_prepack(q, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float() * self.inv_smooth  # (rows, in)
        if x.shape[0] == 1:
            # reduce_range: fbgemm's u8 x s8 pairs add up in int16 on CPUs without VNNI, and overflow there with 8 bits.
            y = torch.ops.quantized.linear_dynamic(x, self._packed, True)
        else:
            x_scale = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127  # (rows, 1)
            y = torch._int_mm((x / x_scale).round().to(torch.int8), self.weight_t) * (x_scale * self.scale)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def calibration_ids(tokenizer) -> torch.Tensor:
    """CALIBRATION as (1, T) token ids of the decoder's tokenizer, for quantize_decoder."""
    return torch.tensor([tokenizer(CALIBRATION, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def input_ranges(decoder: nn.Module, calibration: torch.Tensor) -> dict:
    """Each linear layer's largest |input| per channel while the decoder reads calibration (1, T) token ids."""
    ranges = {}

    def record(module, args):
        x = args[0].detach().abs().flatten(0, -2).amax(0).float()
        ranges[module] = torch.maximum(ranges[module], x) if module in ranges else x

    hooks = [m.register_forward_pre_hook(record) for m in decoder.modules() if isinstance(m, nn.Linear)]
    try:
        decoder(input_ids=calibration)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def quantize_decoder(decoder: nn.Module, method: str, calibration: torch.Tensor | None = None) -> nn.Module:
    """The decoder (any transformers causal LM, possibly wrapped by peft) with its linear layers
    int8 (Int8Linear); the returned module replaces the given one, which is changed in place and must
    not be used any more. calibration: (1, T) token ids of text for SmoothQuant's smoothing (the
    CALIBRATION text tokenized, say); None quantizes without smoothing. The input embedding stays
    float, even when the LM head shares its weight: the image prefix lives in that space."""
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
    if "fbgemm" not in torch.backends.quantized.supported_engines and "onednn" not in torch.backends.quantized.supported_engines:
        raise UserError(f"--quantize {method}: this PyTorch build has no x86 int8 kernels (fbgemm or oneDNN); "
                        f"leave out --quantize")
    if hasattr(decoder, "merge_and_unload"):  # peft: fold the LoRA adapters into the weights first
        decoder = decoder.merge_and_unload()
    conv1d_to_linear(decoder)
    context = decoder_sizes(decoder.config)[2]  # a text longer than the decoder's positions would not fit
    ranges = {} if calibration is None else input_ranges(decoder, calibration[:, :context].to(weight.device))
    linears = [(parent, name, child) for parent in decoder.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    # Two threads: fbgemm's packing runs on one core, so the other rounds the next layer meanwhile
    # (1.3 s -> 0.8 s for SmolLM2 on 2 cores). The warnings filter is process-wide, so set here once.
    with warnings.catch_warnings(), ThreadPoolExecutor(2) as pool:
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
        layers = list(pool.map(lambda item: Int8Linear(item[2], ranges.get(item[2])), linears))
    for (parent, name, _), layer in zip(linears, layers):
        setattr(parent, name, layer)
    return decoder


def conv1d_to_linear(module: nn.Module) -> None:
    """Replaces transformers' Conv1D layers (GPT-2's: y = x @ W + b, W of shape (in, out)) by the
    nn.Linear they are, with W transposed, so that one kind of layer is quantized."""
    from transformers.pytorch_utils import Conv1D
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = nn.Linear(n_in, n_out, device="meta")  # no throw-away initialisation
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(parent, name, linear)
