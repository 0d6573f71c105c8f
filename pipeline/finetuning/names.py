"""The model names of the fine-tuned networks, for every module that names them (the report's too, which must not
import torch): metrics/models/<name>, export.models, the report's rows."""

FINETUNE = "finetune"  # the fine-tuned network (the finetune stage)
FINETUNE_WISE = "finetune-wise"  # WiSE-FT's (pipeline.finetuning.wise): fine-tuned weights mixed with the start


def model_name(config: dict) -> str:
    """The model a fine-tuned folder holds, from its config.json: finetune, or finetune-wise once WiSE-FT mixed its
    weights (its config then records the alpha and the val curve under `wise`)."""
    return FINETUNE_WISE if "wise" in config else FINETUNE
