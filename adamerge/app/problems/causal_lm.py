"""The ``hf_causal_lm`` kind: causal LMs merged whole (tied head included); each task's logits are
next-token predictions on its responses. Its export is the merged model as a Hugging Face folder
with the tokenizer; streamed, its shards with the config and generation config."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from adamerge.app.config import ProblemConfig, TaskConfig
from adamerge.app.problems.data import load_task_data
from adamerge.app.problems.problem import Exporter, MergeProblem, experts_of, load_pretrained, require
from adamerge.io.checkpoints import open_weights


def causal_lm_problem(config: ProblemConfig, streamed: bool = False) -> MergeProblem:
    """``streamed``: the model's structure on ``meta`` and its checkpoint read lazily."""
    from transformers import AutoTokenizer

    from adamerge.tasks import hf

    require(config, "pretrained", "tasks")
    experts = experts_of(config)
    if not experts:
        raise ValueError("problem kind 'hf_causal_lm' needs experts (problem.tasks.<name>.expert or problem.experts)")
    backbone = load_pretrained(config.pretrained, lambda path: hf.load_causal_lm(path, empty=streamed, dtype=config.dtype))
    tokenizer = load_pretrained(config.pretrained, AutoTokenizer.from_pretrained)

    def prepare(table, name: str, task: TaskConfig, labelled: bool):
        return hf.tokenize_prompts(table, tokenizer, task.text, task.response, config.max_length, name)

    calibration, evaluation, validation = load_task_data(config, prepare)
    return MergeProblem(
        pretrained=backbone,
        experts=experts,
        tasks={name: hf.CausalLMTask(name) for name in config.tasks},
        calibration=calibration,
        evaluation=evaluation,
        validation=validation,
        collate=hf.lm_collate(tokenizer),
        exporter=CausalLMExporter(backbone.config, _generation_config(config.pretrained, backbone), tokenizer),
        description={"kind": config.kind, "base": config.pretrained, "experts": experts},
        pretrained_weights=open_weights(config.pretrained, "pretrained") if streamed else None,
    )


class CausalLMExporter(Exporter):
    """The merged model (``AutoModelForCausalLM`` opens it) and its tokenizer; streamed, the model's
    config and the pretrained model's generation settings beside the shards."""

    def __init__(self, config, generation_config, tokenizer):
        self.config, self.generation_config, self.tokenizer = config, generation_config, tokenizer

    def write_model(self, module: nn.Module, folder: Path, max_shard_size: int) -> None:
        from adamerge.tasks.hf import quiet_transformers

        with quiet_transformers():
            module.save_pretrained(folder, max_shard_size=max_shard_size)

    def write_preprocessor(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    def write_config(self, folder: Path) -> None:
        self.config.save_pretrained(folder)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(folder)


def _generation_config(pretrained: str, backbone: nn.Module):
    """The pretrained model's own generation settings: a folder's ``generation_config.json`` (a
    streamed backbone, built from its config alone, holds only defaults), else the backbone's."""
    from transformers import GenerationConfig

    if (Path(pretrained).expanduser() / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(Path(pretrained).expanduser())
    return getattr(backbone, "generation_config", None)
