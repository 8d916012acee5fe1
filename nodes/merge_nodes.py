"""Merge LoRAs: a weighted sum of saved LoRAs as one new file, and the model with it applied."""

from __future__ import annotations

from pathlib import Path

import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io

from ..lora_train_core.errors import ConfigError
from ..lora_train_core.outputs.merge import merge_lora_files
from .train_nodes import PRECISIONS, free_save_path
from .values import CATEGORY

NONE = "(none)"


class MergeLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        loras = [NONE, *folder_paths.get_filename_list("loras")]
        pairs = []
        for i in range(1, 5):
            pairs += [
                io.Combo.Input(
                    f"lora_{i}", options=loras, default=NONE, tooltip=f"LoRA {i} from models/loras/."
                ),
                io.Float.Input(
                    f"weight_{i}",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.05,
                    tooltip=f"Weight of LoRA {i} in the sum.",
                ),
            ]
        return io.Schema(
            node_id="LoRATrainer_MergeLoRAs",
            display_name="Merge LoRAs",
            category=CATEGORY,
            description="Saves sum(weight_i x LoRA_i) as one LoRA: exact (ranks concatenated) or "
            "re-decomposed "
            "to a rank by SVD (reports the retained energy). The MODEL/CLIP outputs carry the merged LoRA.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the merged LoRA to."),
                io.Clip.Input("clip", tooltip="The CLIP to apply the merged LoRA to."),
                *pairs,
                io.Combo.Input(
                    "mode",
                    options=["concat", "svd"],
                    default="concat",
                    tooltip="concat: exact; svd: best approximation at `rank`.",
                ),
                io.Int.Input("rank", default=32, min=1, max=1024, tooltip="Rank of the svd merge."),
                io.String.Input("lora_name", default="merged_lora", tooltip="File name in models/loras/."),
                io.Boolean.Input(
                    "overwrite", default=False, tooltip="Replace an existing file of that name."
                ),
                io.Combo.Input("save_precision", options=PRECISIONS, default="fp16", tooltip="Saved dtype."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the merged LoRA."),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the merged LoRA."),
                io.String.Output(
                    display_name="report", tooltip="Where it was saved and the retained energy."
                ),
            ],
        )

    @classmethod
    def execute(cls, model, clip, mode, rank, lora_name, overwrite, save_precision, **pairs) -> io.NodeOutput:
        specs = []
        for i in range(1, 5):
            name = pairs.get(f"lora_{i}", NONE)
            if name != NONE:
                path = folder_paths.get_full_path("loras", name)
                if path is None:
                    raise ConfigError(f"Merge LoRAs: lora_{i} {name!r} is not in models/loras/")
                specs.append((Path(path), pairs[f"weight_{i}"]))
        if not specs:
            raise ConfigError("Merge LoRAs: choose at least one LoRA")
        out = free_save_path(lora_name, overwrite)
        saved, result = merge_lora_files(
            specs, out, mode, rank if mode == "svd" else None, save_precision, overwrite
        )
        report = f"saved {saved}" + (f"; {result.energy_summary()}" if result.retained_energy else "")
        lora = comfy.utils.load_torch_file(str(saved), safe_load=True)
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        return io.NodeOutput(model_out, clip_out, report)
