"""Pre-training tasks: `loss, metrics = task(model, batch, ctx)`."""

from opt_ds.tasks.base import TaskContext, TextSpecials, step_generator
from opt_ds.tasks.concepts import ConceptGrounding, MaskedConceptRecovery
from opt_ds.tasks.contrastive import CrossModalContrastive
from opt_ds.tasks.generation import ImageGeneration, TextGeneration
from opt_ds.tasks.matching import ModalityMatching
from opt_ds.tasks.pair_matching import HardNegativeMatching
from opt_ds.tasks.runner import run_tasks
from opt_ds.tasks.schedule import ScheduleConfig, StageConfig, TaskScheduler
from opt_ds.tasks.settings import TasksConfig
from opt_ds.tasks.token import MaskedAudioModeling, MaskedLanguageModeling, MaskedVisionModeling

TASKS = {
    t.name: t
    for t in (
        MaskedLanguageModeling,
        MaskedVisionModeling,
        MaskedAudioModeling,
        TextGeneration,
        ImageGeneration,
        ModalityMatching,
        CrossModalContrastive,
        MaskedConceptRecovery,
        HardNegativeMatching,
        ConceptGrounding,
    )
}
NEEDS_IMAGE_TOKENIZER = {"mvm", "image_gen"}
NEEDS_CONCEPTS = {"mcr", "grounding"}  # a concept vocabulary in the data and concept inputs in the model
# OPT's and UNIMO's tasks: the default schedule, and what the speed benchmarks run (MVP's three are opted into)
DEFAULT_TASKS = tuple(ScheduleConfig().stages[0].tasks)


def build_tasks(settings: TasksConfig | None = None) -> dict:
    """Every task, each with its section of the `tasks:` config (defaults without one)."""
    settings = settings or TasksConfig()
    return {name: cls(getattr(settings, name)) for name, cls in TASKS.items()}


__all__ = [
    "run_tasks",
    "TASKS",
    "NEEDS_IMAGE_TOKENIZER",
    "NEEDS_CONCEPTS",
    "DEFAULT_TASKS",
    "build_tasks",
    "TaskContext",
    "TextSpecials",
    "step_generator",
    "ScheduleConfig",
    "StageConfig",
    "TaskScheduler",
    "TasksConfig",
]
