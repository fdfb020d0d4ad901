"""The loss zoo of reference/methods.md, by name. Importing this package registers every loss."""

from asymret.training.losses import (
    acd,  # noqa: F401  (ACD's collaborative distillation, §4)
    aml,  # noqa: F401  (AML, methods.md §2)
    distill,  # noqa: F401  (re-ID distillers, §3)
    local,  # noqa: F401  (local-feature carry-overs, §5)
    reid,  # noqa: F401  (supervised re-ID losses, §1, §3)
)
from asymret.training.losses.registry import (  # noqa: F401
    LOSSES,
    CombinedLoss,
    LossBatch,
    LossInfo,
    LossOutput,
    build_loss,
    combined_needs,
    create_loss,
    list_losses,
    loss_infos,
    register_loss,
)
