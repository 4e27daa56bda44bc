"""Every loss and advantage estimator of the pipeline, as pure functions of tensors.

Nothing here knows about models, batches or configs: a stage computes log-probs / values / scores
with its model and hands the tensors to one of these functions. Conventions shared by all of them:

- Masks may be bool or 0/1 floats; 1 (True) marks a position that counts.
- Hyperparameters are keyword arguments (`beta`, `gamma`, `clip_eps`, ...).
- The output dtype follows the inputs: float32 in, float32 out; float64 in, float64 out. Half-precision
  logits are promoted to float32 before any softmax.
- Diagnostics (clipfrac, implicit rewards) and advantages come back detached.
- Log-sigmoids and log(1 - e^p) go through `F.logsigmoid`, `F.softplus` and `log1mexp`, so the results
  stay finite for log-probs from -1e3 up to 0 and for rewards of +-100.

The package re-exports every function, so `from minirlhf.losses import dpo_loss` works whatever file it
lives in:

    common.py      IGNORE_INDEX, masked_mean / masked_var / masked_whiten, token_logps, lm_loss,
                   sequence_logps, entropy_from_logits
    preference.py  reward_pair_loss, reward_centering_loss, dpo_loss, simpo_loss, orpo_loss, log1mexp, kto_loss
    ppo.py         kl_penalized_rewards, gae, ppo_advantages, ppo_policy_loss, ppo_value_loss, approx_kl,
                   explained_variance
    grpo.py        the GRPO family: group_relative_advantages, leave_one_out_advantages, grpo_advantages,
                   grpo_policy_loss, ... (also ppo's critic-free estimators)

See docs/losses.md for the list of losses, their papers and the stage that uses each one.
"""

from minirlhf.losses.common import (
    IGNORE_INDEX,
    entropy_from_logits,
    lm_loss,
    masked_mean,
    masked_var,
    masked_whiten,
    sequence_logps,
    token_logps,
)
from minirlhf.losses.grpo import (
    ADVANTAGE_ESTIMATORS,
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    REWARD_AGGREGATIONS,
    SCALE_REWARDS,
    decoupled_group_advantages,
    group_relative_advantages,
    grpo_advantages,
    grpo_policy_loss,
    informative_groups,
    leave_one_out_advantages,
    mask_truncated_completions,
    nan_std,
    weighted_reward_sum,
)
from minirlhf.losses.ppo import (
    PPO_ESTIMATORS,
    approx_kl,
    explained_variance,
    gae,
    kl_penalized_rewards,
    ppo_advantages,
    ppo_policy_loss,
    ppo_value_loss,
)
from minirlhf.losses.preference import (
    dpo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    reward_centering_loss,
    reward_pair_loss,
    simpo_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "GRPO_LOSS_TYPES", "IGNORE_INDEX", "IMPORTANCE_SAMPLING_LEVELS", "REWARD_AGGREGATIONS",
    "PPO_ESTIMATORS", "SCALE_REWARDS", "approx_kl", "decoupled_group_advantages", "dpo_loss", "entropy_from_logits",
    "explained_variance", "gae",
    "group_relative_advantages", "grpo_advantages", "grpo_policy_loss", "informative_groups", "kl_penalized_rewards",
    "kto_loss", "leave_one_out_advantages", "lm_loss", "log1mexp", "mask_truncated_completions", "masked_mean",
    "masked_var", "masked_whiten", "nan_std", "orpo_loss", "ppo_advantages", "ppo_policy_loss", "ppo_value_loss",
    "reward_centering_loss", "reward_pair_loss", "sequence_logps", "simpo_loss", "token_logps",
    "weighted_reward_sum",
]
