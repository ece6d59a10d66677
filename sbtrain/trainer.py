"""The training loop: groups -> model -> DDP + distributed optimizer -> 1F1B schedule."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from ops.comm import SPContext
from ops.documents import segment_ids_from_tokens
from ops.loss import linear_cross_entropy
from parallel.data import microbatches
from parallel.param_gather import wait_for_params
from parallel.sequence import slice_microbatch, sp_context
from sbtrain.checkpoint import checkpoint_dir
from sbtrain.checkpoint_writer import CheckpointWriter
from sbtrain.config import RunConfig, dump_config
from sbtrain.data.datasets import document_eod
from sbtrain.model.batch import batch_context
from sbtrain.observe import RunObserver
from sbtrain.safety import RunLock, StepGuard, StopRequest, TrainingDiverged, Verdict
from sbtrain.setup_report import report_setup
from sbtrain.spiking.layers import recording
from sbtrain.trainer_setup import TrainState, build_train_state
from sbtrain.watchdog import Watchdog


logger = logging.getLogger("sbtrain.train")


def _forward_step(data_iterator, model, loss_chunk_tokens: int = 0, sp: SPContext | None = None,
                  sink_tokens: int = 0):
    """One micro-batch forward; ``loss_chunk_tokens`` > 0 (``train.loss_chunk_tokens`` resolved,
    e.g. ``auto`` on a GPU with tp 1) replaces GPTModel's output layer + loss by ``ops.loss``.

    The micro-batch's documents and SP slice metadata are derived here, once, into a
    ``sbtrain.model.batch.BatchContext`` that rides in Megatron's ``packed_seq_params`` to every
    layer (``sp``: the structural SP context, None for sp 1; ``sink_tokens``: the model's)."""
    batch = next(data_iterator)
    extra = {}
    if loss_chunk_tokens:
        extra["output_processor"] = partial(_chunked_loss, loss_chunk_tokens,
                                            wait=partial(wait_for_params, model))
    seq = batch["tokens"].shape[1]
    rope_length = (1 if sp is None else sp.size) * (sink_tokens + seq)
    context = batch_context(seq, batch.get("segment_ids"), sp, rope_length)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   packed_seq_params=context, **extra)
    return output, partial(_loss, batch["loss_mask"], batch["loss_tokens"])


def _chunked_loss(chunk_tokens: int, *, hidden_states, output_layer, output_weight, labels,
                  wait=None, **unused):
    """GPTModel's output step as per-token losses from ``ops.loss`` (``train.loss_chunk_tokens``):
    the same numbers as its output layer + cross-entropy, without the whole logits (nor their
    fp32 copies). The weight is the output layer's, or the embedding's when tied (the gradient
    then goes to the embedding, as in Megatron's path). ``wait([weight])`` first finishes its
    overlapped all-gather (``parallel.param_gather``): the output layer's forward, where DDP
    would wait, is not called. The output layer's own ``gradient_accumulation_fusion`` flag (the
    run's, as Megatron's output layer would use it) decides whether the weight gradient goes
    straight into ``main_grad`` under DDP (``ops.main_grad``)."""
    weight = output_weight if output_weight is not None else output_layer.weight
    if wait is not None:
        wait([weight])
    return linear_cross_entropy(hidden_states, weight, labels, chunk_tokens,
                                grad_accum_fusion=output_layer.gradient_accumulation_fusion)


def _loss(loss_mask: torch.Tensor, loss_tokens: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean loss over the micro-batch's ``loss_tokens`` (all sequence-parallel slices): under
    sp > 1 this rank's share, which the schedule multiplies by sp (parallel.sequence)."""
    mask = loss_mask.to(per_token_loss.device).float().view(-1)
    loss = (per_token_loss.float().view(-1) * mask).sum() / loss_tokens.clamp(min=1)
    # clone: the schedule divides the returned loss by the micro-batch count in place.
    return loss, {"lm loss": loss.detach().clone()}


class Trainer:
    """Runs one training job described by a RunConfig (see ``sbtrain train``)."""

    def __init__(self, cfg: RunConfig, source: str = "") -> None:
        self.cfg, self.source = cfg, source
        self.state: TrainState | None = None
        self.eod: int | None = None
        """EOD id that separates packed documents, when ``data.document_mask`` is on."""
        self.guard: StepGuard | None = None
        self.watchdog: Watchdog | None = None
        """Running during train(); evaluation beats it per iteration."""
        self.lock = RunLock([cfg.train.run_dir, cfg.checkpoint.save_dir])
        self._local_loss = 0.0
        """This rank's share of the last step's loss, before any reduction (the guard's input)."""
        self.writer: CheckpointWriter | None = None
        """Checkpoint saves (asynchronous with checkpoint.async_save); built by setup()."""
        self.observer: RunObserver | None = None
        """metrics.jsonl and its sinks, traces, the end-of-run plot; built by setup()."""
        self._sp: SPContext | None = None
        """The SP group's context (parallel.sp > 1), completed per micro-batch by _forward_step."""

    def setup(self) -> TrainState:
        self.state = build_train_state(self.cfg, self.source)
        self.lock.acquire(self.state.device)
        t = self.cfg.train
        self.guard = StepGuard(t.max_skipped_steps, t.loss_spike_factor, self.state.model,
                               self.state.device)
        tconfig = get_model_config(self.state.model)
        tconfig.finalize_model_grads_func = self._timed_grad_reduce(self._finish_overlapped_reduce(
            self.guard.wrap_finalize(tconfig.finalize_model_grads_func)))
        ck = self.cfg.checkpoint
        self.writer = CheckpointWriter(ck.save_dir, ck.keep_last, ck.async_save,
                                       ck.fully_parallel_save, self.state.groups.pg_collection.dp)
        self.observer = RunObserver(self.cfg, self.state.start_step, self.state.is_logging_rank,
                                    self.state.device, self.state.groups.rank)
        if self.cfg.data.document_mask:
            self.eod = document_eod(self.cfg)
        # the softmax mixers set their layer kind's exchange on it (parallel.sequence.with_exchange)
        self._sp = sp_context(self.state.groups.pg_collection)
        if self._sp is not None:  # parallel.sp_early_exchange: the A/B switch of the overlap
            self._sp = dataclasses.replace(self._sp, early_exchange=self.cfg.parallel.sp_early_exchange)
        if self.state.is_logging_rank:
            run_dir = Path(self.cfg.train.run_dir)
            dump_config(self.cfg, run_dir / "resolved_config.yaml")
            report_setup(self.cfg, self.state)
        return self.state

    def _device_batches(self, step: int, split: str):
        s, t = self.state, self.cfg.train
        dataset = s.train_ds if split == "train" else s.valid_ds
        sp = s.groups.pg_collection.cp
        # training continues the stream where earlier stages stopped (data.start_tokens)
        first = self.cfg.data.first_sample(t.seq_length) if split == "train" else 0
        for batch in microbatches(dataset, step, t.global_batch_size, t.micro_batch_size,
                                  s.groups.dp_rank, s.groups.dp_size, first):
            if self.eod is not None:
                # on the whole sequence: ids stay global across sequence-parallel slices
                batch["segment_ids"] = segment_ids_from_tokens(batch["tokens"], self.eod)
            batch = slice_microbatch(batch, sp.rank(), sp.size())
            yield {k: v.to(s.device, non_blocking=True) for k, v in batch.items()}

    def _timed_batches(self, batches):
        """The schedule's data iterator, charging the wait for each micro-batch to data_wait."""
        tracker = self.state.tracker
        while True:
            with tracker.section("data_wait", parent="forward_backward", sync=False):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def _timed_grad_reduce(self, finalize):
        """Charge Megatron's gradient finalization to grad_reduce: the whole data-parallel
        reduction, or with ``parallel.overlap_grad_reduce`` the wait for the buckets still in
        flight when backward ends (the communication that was not hidden)."""
        def timed(*args, **kwargs):
            with self.state.tracker.section("grad_reduce", parent="forward_backward"):
                return finalize(*args, **kwargs)

        return timed

    def _finish_overlapped_reduce(self, finalize):
        """With ``parallel.overlap_grad_reduce`` the buckets' reductions were issued during
        backward and write into the gradient buffers: wait for them (``finish_grad_sync``, a
        no-op when finalize calls it again) before the guard reads the buffers. The guard then
        sees the reduced shards, so a NaN is also reported by the rank whose shard it reached."""
        model = self.state.model
        if not model.ddp_config.overlap_grad_reduce:
            return finalize

        def finish_then_finalize(*args, **kwargs):
            model.finish_grad_sync(force_all_reduce=kwargs.get("force_all_reduce", False))
            return finalize(*args, **kwargs)

        return finish_then_finalize

    @contextlib.contextmanager
    def _params_gathered(self):
        """With ``parallel.overlap_param_gather`` the last update reaches the other ranks'
        copies only during the next forward (per module): a save or an evaluation first
        gathers every bucket and runs without the per-module waits, as Megatron's own training
        loop does; the waits are re-armed after."""
        model = self.state.model
        if not model.ddp_config.overlap_param_gather:
            yield
            return
        model.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            model.enable_forward_pre_hook()

    def _run_schedule(self, step: int, split: str, forward_only: bool) -> float:
        s, t = self.state, self.cfg.train
        num_micro = t.global_batch_size // (t.micro_batch_size * s.groups.dp_size)
        losses = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, loss_chunk_tokens=t.resolved_loss_chunk_tokens(
                self.cfg.parallel.tp, s.device.type), sp=self._sp, sink_tokens=self.cfg.model.sink_tokens),
            data_iterator=self._timed_batches(self._device_batches(step, split)),
            model=[s.model],
            num_microbatches=num_micro,
            # Stages exchange this rank's slice plus the sink tokens' positions; Megatron
            # divides the length it is given by the context-parallel size (= sp).
            seq_length=t.seq_length + self.cfg.parallel.sp * self.cfg.model.sink_tokens,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )
        return self._reduce_loss(losses)

    def _reduce_loss(self, losses: list[dict]) -> float:
        """Mean micro-batch loss over the global batch, known on every rank. The sums stay on
        the device until one read at the end (a read per micro-batch and per group stalled
        the host while the device drained its queue); added in the micro-batches' order in
        float64, as the host did."""
        s = self.state
        pgc = s.groups.pg_collection
        local = torch.zeros(2, dtype=torch.float64, device=s.device)
        if s.groups.is_last_stage and losses:
            for x in losses:
                local[0] += x["lm loss"].to(local)
            # sequence-parallel ranks hold shares of the same micro-batches' losses
            local[1] = len(losses) if pgc.cp.rank() == 0 else 0
        reduced = local.clone()
        # Only the last stage has losses: summing over pp broadcasts them; then over the
        # sequence-parallel shares and dp.
        for group in (pgc.pp, pgc.cp, pgc.dp):
            dist.all_reduce(reduced, group=group)
        self._local_loss, total, count = torch.cat([local[:1], reduced]).cpu().tolist()  # one read
        return total / count if count else math.nan  # as the tensor division gave

    def train_step(self, step: int, stop: StopRequest | None = None) -> tuple[dict, Verdict]:
        """One step; its update is applied only when every rank agrees that it is sane
        (``sbtrain.safety.StepGuard``), otherwise weights, optimizer and LR schedule stay."""
        s = self.state
        s.model.zero_grad_buffer()
        s.optimizer.zero_grad()
        spikes = self._spike_recording(step)
        with s.tracker.section("forward_backward"), spikes as recorder:
            loss = self._run_schedule(step, "train", forward_only=False)
        with s.tracker.section("optimizer"):
            verdict = self.guard.check(step, loss, self._local_loss, stop or StopRequest([], 0))
            if verdict.skip_reason:
                grad_norm = self._skipped_grad_norm()
            else:
                _, grad_norm, _ = s.optimizer.step()
                s.scheduler.step(increment=1)
        record = {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                  "lr": s.optimizer.param_groups[0]["lr"]}
        if verdict.skip_reason:
            record.update(skipped=verdict.skip_reason, skipped_total=self.guard.total)
        if recorder is not None:
            record.update(self._spike_stats(recorder))
        return record, verdict

    def _skipped_grad_norm(self) -> float:
        """The grad norm of a step that is not applied, for its log line (all ranks agree to
        skip, so all take part in the norm's reductions)."""
        self.state.optimizer.prepare_grads()
        return float(self.state.optimizer.get_grad_norm())

    def _spike_recording(self, step: int):
        """Record firing on logged steps when spiking is on (an extra counting pass)."""
        logged = (step + 1) % self.cfg.train.log_interval == 0
        if not (self.cfg.spiking.enabled and logged):
            return contextlib.nullcontext()

        return recording()

    def _spike_stats(self, recorder) -> dict:
        """Mean |spike count| per activation and the fraction that fire, over all ranks (the
        recorder's sums stay on the device: one read, after the all-reduce)."""
        totals = recorder.totals(self.state.device)
        dist.all_reduce(totals)
        abs_counts, firing, elements = totals.tolist()
        return {"spike_mean_count": abs_counts / max(elements, 1.0),
                "spike_firing_rate": firing / max(elements, 1.0)}

    def evaluate(self, step: int) -> float:
        s = self.state
        s.model.eval()
        total = 0.0
        with torch.no_grad(), self._params_gathered():
            for i in range(self.cfg.train.eval_iters):
                total += self._run_schedule(step * self.cfg.train.eval_iters + i, "valid",
                                            forward_only=True)
                if self.watchdog is not None:
                    self.watchdog.beat()
        s.model.train()
        return total / self.cfg.train.eval_iters

    def train(self) -> list[dict]:
        """Train from the resumed step to ``train.train_iters``; returns the per-step records.

        Stops early, after saving, on ``train.exit_signals``, ``train.exit_duration_minutes``
        or ``train.exit_at_step``; raises TrainingDiverged (nothing saved) after
        ``train.max_skipped_steps`` consecutive skipped steps."""
        s = self.state or self.setup()
        t = self.cfg.train
        stop = StopRequest(t.exit_signals, t.exit_duration_minutes)
        watchdog = self.watchdog = Watchdog(t.hang_timeout_minutes, s.groups.rank,
                                            dist.get_backend())
        stop.install()
        watchdog.start()
        try:
            records = self._loop(stop, watchdog)
            self.finalize_saves()
        except TrainingDiverged:  # agreed by all ranks: the save in flight is still good
            self.finalize_saves()
            raise
        except BaseException:  # maybe this rank only: a collective finalize could hang
            self.writer.abort()
            raise
        finally:
            watchdog.stop()
            self.watchdog = None
            stop.uninstall()
            self.lock.release()
            self.observer.close()
        self._write_summary()
        self.observer.plot()
        return records

    def _loop(self, stop: StopRequest, watchdog: Watchdog) -> list[dict]:
        s = self.state
        t, ck = self.cfg.train, self.cfg.checkpoint
        records = []
        tokens_per_step = t.global_batch_size * t.seq_length
        for step in range(s.start_step, t.train_iters):
            s.tracker.start_step()
            self.observer.step_begins(step + 1)
            record, verdict = self.train_step(step, stop)
            stats = s.tracker.end_step(tokens_per_step)
            self.observer.step_ends(step + 1)
            record.update(step=step + 1, **_stats_fields(stats))
            if step == s.start_step and step > 0:
                record["resumed_from"] = step  # metrics.jsonl: the steps after are re-runs
            if t.eval_interval and (step + 1) % t.eval_interval == 0:
                record["eval_loss"] = self.evaluate(step)
            records.append(record)
            self._log(record, stats)
            watchdog.beat()
            if not ("skipped" in record and self.guard.diverged):  # diverged: no save
                blocked = self._finalize_saves(blocking=False)
                if ck.save_dir and ck.save_interval and (step + 1) % ck.save_interval == 0:
                    blocked += self.save(step + 1)
                    watchdog.beat()
                s.tracker.add_after_step("checkpoint", blocked)
            record.update({f"time_{name}_s": t for name, t in stats.sections_s.items()})
            self.observer.write(record)
            self._report_skip(record)
            if verdict.stop_reason:
                self._say(f"stopping after step {step + 1}: {verdict.stop_reason}")
                break
            if t.exit_at_step and step + 1 >= t.exit_at_step:
                break
        last = records[-1]["step"] if records else s.start_step
        if ck.save_dir and records and (not ck.save_interval or last % ck.save_interval):
            self.save(last)
        return records

    def _report_skip(self, record: dict) -> None:
        """One line per skipped step; after too many in a row, stop without saving."""
        if "skipped" not in record:
            return
        g = self.guard
        self._say(f"step {record['step']}: update skipped ({record['skipped']}; grad norm "
                  f"{record['grad_norm']:.6g}); {g.consecutive} in a row, "
                  f"train.max_skipped_steps = {g.max_skipped}")
        if g.diverged:
            raise TrainingDiverged(
                f"{g.consecutive} consecutive steps skipped up to step {record['step']} "
                f"(last: {record['skipped']}); stopping without saving, the last good "
                f"checkpoint is kept (lower optim.lr, or raise train.max_skipped_steps)")

    def _say(self, line: str) -> None:
        if self.state.is_logging_rank:
            print(line, flush=True)

    def save(self, step: int, blocking: bool = False) -> float:
        """Save ``step`` (collective). With ``checkpoint.async_save`` the shards are written in
        the background and committed later (``finalize_saves``) unless ``blocking``. Returns
        the seconds training was blocked."""
        s = self.state
        blocked = self._finalize_saves(blocking=True)  # one save in flight at a time
        with self._params_gathered():
            blocked += self.writer.save(step, s.model, s.optimizer, s.scheduler)
        if self.writer.pending:
            self._say(f"checkpoint step {step}: writing in the background (blocked "
                      f"{blocked:.2f} s)")
            if blocking:
                blocked += self.finalize_saves()
        else:
            self._say(f"saved checkpoint {checkpoint_dir(self.cfg.checkpoint.save_dir, step)} "
                      f"(blocked {blocked:.2f} s)")
        return blocked

    def finalize_saves(self) -> float:
        """Wait for every asynchronous save in flight and commit it (collective); returns the
        seconds waited. Called at the end of train(), also after a stop signal."""
        return self._finalize_saves(blocking=True)

    def _finalize_saves(self, blocking: bool) -> float:
        before = list(self.writer.pending)
        waited = self.writer.wait() if blocking else self.writer.poll()
        for step in before[:len(before) - len(self.writer.pending)]:
            self._say(f"saved checkpoint {checkpoint_dir(self.cfg.checkpoint.save_dir, step)} "
                      f"(committed in the background; waited {waited:.2f} s)")
        return waited

    def _log(self, record: dict, stats) -> None:
        s = self.state
        if not s.is_logging_rank:
            return
        if (record["step"] % self.cfg.train.log_interval == 0
                or record["step"] == self.cfg.train.train_iters):
            stats = dataclasses.replace(stats, step=record["step"])
            line = s.tracker.format_step(stats, total_steps=self.cfg.train.train_iters,
                                         loss=record["loss"], lr=record["lr"],
                                         grad_norm=record["grad_norm"])
            if "spike_firing_rate" in record:
                line += (f" | spikes {record['spike_mean_count']:.2f}/act, "
                         f"firing {100 * record['spike_firing_rate']:.1f}%")
            if "eval_loss" in record:
                line += f" | eval {record['eval_loss']:.4f}"
            print(line, flush=True)

    def _write_summary(self) -> None:
        s = self.state
        if s.is_logging_rank:
            path = Path(self.cfg.train.run_dir) / self.cfg.profiler.summary_file
            s.tracker.write_summary(path)
            print(f"profile summary: {path}", flush=True)


def _stats_fields(stats) -> dict:
    return {
        "step_time_s": stats.step_time_s,
        "tokens_per_s": stats.tokens_per_s,
        "tgs": stats.tgs,
        "mfu": stats.mfu,
        "peak_mem_gib": stats.peak_memory_gib,
    }
