"""transformers Trainer support: the bias-step callback and a Trainer that adds the layers' balance losses.

Needs transformers, imported only inside :func:`trainer_callback` and :func:`aux_loss_trainer`.
"""
from __future__ import annotations

import torch

from ..model import aux_loss, expert_load, update_biases
from ..padding import _attention_mask_2d, _padding_from_attention_mask, padding_mask


def trainer_callback():
    """A ``transformers.TrainerCallback`` that runs :func:`update_biases` after every optimizer step (the
    aux-loss-free bias step, and the end of the global-batch balance window). :func:`aux_loss_trainer` adds it by
    itself; add it yourself to other Trainers. Needs transformers."""
    from transformers import TrainerCallback

    class DeepSeekMoECallback(TrainerCallback):
        deepseek_moe = True

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None:
                update_biases(model)

    return DeepSeekMoECallback()


def _real_tokens(inputs) -> int:
    """Tokens the MoE layers route in one batch: the attention mask's ones, else every (B, S) input position."""
    mask = _attention_mask_2d(inputs)
    if mask is not None:
        return int(mask.ne(0).sum())
    for key in ("input_ids", "inputs_embeds"):
        t = inputs.get(key)
        if isinstance(t, torch.Tensor):
            return t.shape[0] * t.shape[1]
    return 0


def aux_loss_trainer(trainer_cls=None):
    """A subclass of ``transformers.Trainer`` (or of ``trainer_cls``) for models with DeepSeekMoE layers:

    * its loss adds ``dm.aux_loss(model)`` weighted by the micro-batch's share of the real tokens of the whole
      accumulated batch (counted from the attention masks of all its micro-batches, over all ranks when
      ``average_tokens_across_devices`` is on), compensating the Trainer's own scaling of the loss. So 4
      micro-batches of 1 sequence and 1 of 4 give the same gradients for the balance scopes whose loss does not
      depend on how the batch is split ("sequence", and the z-loss); the "micro_batch" scope's f is per
      micro-batch by definition;
    * a 2-D ``attention_mask`` in the inputs becomes the layers' padding mask (:func:`deepseek_moe.padding_mask`);
    * :func:`trainer_callback` is added, so biases update and balance windows close after every optimizer step;
    * its logs carry ``moe/<layer>/max_vio`` for every DeepSeekMoE layer (from the last forward).
    """
    from transformers import Trainer

    base = trainer_cls or Trainer

    class DeepSeekMoETrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._moe_window_tokens = None
            if not any(getattr(cb, "deepseek_moe", False) for cb in self.callback_handler.callbacks):
                self.add_callback(trainer_callback())

        def _averages_tokens_across_devices(self) -> bool:
            return bool(self.args.average_tokens_across_devices and self.args.world_size > 1)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
            tokens = torch.tensor(sum(_real_tokens(b) for b in batch_samples), device=device)
            if self._averages_tokens_across_devices():
                tokens = self.accelerator.gather(tokens).sum()
            self._moe_window_tokens = int(tokens)
            return batch_samples, num_items_in_batch

        def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
            # Around forward and backward: activation checkpointing re-runs the forward inside backward.
            with padding_mask(_padding_from_attention_mask(inputs)):
                return super().training_step(model, inputs, num_items_in_batch, **kwargs)

        def prediction_step(self, model, inputs, *args, **kwargs):
            with padding_mask(_padding_from_attention_mask(inputs)):
                return super().prediction_step(model, inputs, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch, **kwargs)
            if model.training:
                loss = loss + aux_loss(model).to(loss.device) * self._aux_loss_weight(inputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

        def _aux_loss_weight(self, inputs, num_items_in_batch) -> float:
            """This micro-batch's token share, times what the Trainer later divides the loss by."""
            if not self._moe_window_tokens:
                return 1.0
            weight = _real_tokens(inputs) / self._moe_window_tokens
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                          or self.compute_loss_func is not None)
            if not scaled:  # the Trainer divides the whole loss by the accumulation steps
                return weight * self.current_gradient_accumulation_steps
            if self._averages_tokens_across_devices() and num_items_in_batch is not None:
                weight *= self.accelerator.num_processes // self.get_tp_size()  # the Trainer's loss scale
            return weight

        def log(self, logs, *args, **kwargs):
            logs = {**logs, **{f"moe/{k}": v for k, v in expert_load(self.model).items() if k.endswith("max_vio")}}
            return super().log(logs, *args, **kwargs)

    return DeepSeekMoETrainer
