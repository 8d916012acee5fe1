"""Chroma: Flux.1-schnell's DiT with its modulation Linears pruned (one small "distilled guidance"
network computes every block's modulation from σ), conditioned on T5-XXL alone, with the T5
attention mask applied, over the Flux AE.

kohya trains it with flux_train_network.py `--model_type chroma`: CLIP-L is replaced by a dummy, and
`apply_t5_attn_mask` is required (the denoiser attends to the caption's tokens and one padding
token). Its LoRA names are Flux's native paths minus the absent `*_mod_lin` / `modulation_lin`
(flux.diffusers_targets skips them). Strings as sd-scripts writes them: `ss_base_model_version`
"chroma" (library/flux_utils.py MODEL_VERSION_CHROMA), `ss_model_type` "chroma",
`modelspec.architecture` "chroma" + "/lora", implementation lodestones' repository
(library/sai_model_spec.py ARCH_FLUX_1_CHROMA, IMPL_CHROMA).

Text-encoder LoRA: kohya's would go on T5 (`lora_te3`), which is not implemented here, so the row
lists no text-encoder prefix and `network.train_text_encoder` is refused (run/checks.py).
No guidance input: diffusers' ChromaTransformer2DModel feeds its approximator guidance 0 itself,
the value kohya's docs train Chroma with.
"""

from __future__ import annotations

from . import ModelFamily
from .flux import FLUX_COMMON

FAMILY = ModelFamily(
    name="chroma",
    title="Chroma",
    modelspec_architecture="chroma/lora",
    **(
        FLUX_COMMON
        | dict(
            text_encoder_prefixes=(),
            base_model_version="chroma",
            modelspec_implementation="https://huggingface.co/lodestones/Chroma",
            pooled_text=False,
            diffusers_pipeline="ChromaPipeline",
            kohya_model_type="chroma",
            t5_max_length=512,
            t5_attention_mask=True,
        )
    ),
)
