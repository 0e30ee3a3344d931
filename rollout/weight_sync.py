"""Weight sync from the learner into the rollout engines, and the controller's handle on it.

`WeightSync(cfg, learners, rollout, directory).push(version)` after each optimizer step, with
one of two transports:
- `file`: learner rank 0 writes the full state dict as safetensors on a filesystem both sides can
  read (one node, or a shared mount); every vLLM worker reloads it.
- `collective`: learner rank 0 broadcasts the weights in buckets over a process group of its own,
  whose other members are the vLLM workers of every engine (gloo on CPU, NCCL on GPU).

Engine-side code runs inside each vLLM worker as methods of `WeightLoader`, which vLLM mixes into
its workers (`worker_extension_cls`) and `collective_rpc` calls by name, so no function is
pickled and vLLM's insecure serialization stays off. Both transports load through the worker's
`reload_weights`, i.e. the model's own weight loaders, which the CPU backend needs (it repacks
linear weights after loading).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from itertools import accumulate
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import torch

from rl.fileio import publish_file

# Members of a collective group wait this much longer than the driver's deadline, so that the
# driver's deadline (which names the engine that did not answer) fires before a member's own
# timeout error, and a group that broke off frees its members soon after the driver gives up.
GRACE_S = 10.0


# ---------------------------------------------------------------- buckets (pure)

@dataclass(frozen=True)
class Bucket:
    """Tensors of one dtype, flattened back to back into one buffer."""
    dtype: str  # torch dtype name, e.g. "bfloat16"
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _dtype(self.dtype)


def plan_buckets(tensors: Iterable[tuple[str, Sequence[int], torch.dtype]], bucket_bytes: int) -> list[Bucket]:
    """(name, shape, dtype) in order -> buckets in the same order, each of one dtype and at most
    `bucket_bytes` (a larger tensor gets a bucket of its own)."""
    buckets, current, size = [], [], 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        if current and (dtype != current[0][2] or size + nbytes > bucket_bytes):
            buckets.append(_bucket(current))
            current, size = [], 0
        current.append((name, tuple(shape), dtype))
        size += nbytes
    if current:
        buckets.append(_bucket(current))
    return buckets


def _bucket(entries) -> Bucket:
    names, shapes, dtypes = zip(*entries)
    return Bucket(str(dtypes[0]).removeprefix("torch."), names, shapes)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def buckets_to_json(buckets: list[Bucket]) -> str:
    return json.dumps([{"dtype": b.dtype, "names": list(b.names), "shapes": [list(s) for s in b.shapes]}
                       for b in buckets])


def buckets_from_json(text: str | bytes) -> list[Bucket]:
    return [Bucket(b["dtype"], tuple(b["names"]), tuple(tuple(s) for s in b["shapes"])) for b in json.loads(text)]


def flatten(bucket: Bucket, tensors: Mapping[str, torch.Tensor], device=None,
            gathered: Callable[[torch.Tensor], ContextManager] = nullcontext) -> torch.Tensor:
    """The bucket's tensors copied into one new buffer, one at a time: under ZeRO-3, `gathered(t)`
    materialises one parameter while it is copied."""
    flat = torch.empty(bucket.numel, dtype=bucket.torch_dtype, device=device)
    for name, start, size in zip(bucket.names, accumulate(bucket.sizes, initial=0), bucket.sizes):
        with gathered(tensors[name]):
            flat[start:start + size].copy_(tensors[name].detach().reshape(-1))
    return flat


def unflatten(flat: torch.Tensor, bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """(name, view of `flat`) for each tensor of the bucket."""
    return [(name, part.view(shape)) for name, part, shape in zip(bucket.names, flat.split(bucket.sizes), bucket.shapes)]


# ---------------------------------------------------------------- the collective group

class WeightGroup:
    """A process group of its own between learner rank 0 (rank 0: the sender, hosting the
    TCPStore) and the engines' vLLM workers. It is made directly from a backend class, so it never
    touches DeepSpeed's default group on the learner nor vLLM's groups in the engine workers.
    `host` is the address this member's gloo connections bind to (127.0.0.1 on one node)."""

    def __init__(self, address: str, port: int, rank: int, world_size: int, timeout_s: float,
                 device: torch.device, host: str):
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        self.device = torch.device(device)
        self.store = dist.TCPStore(address, port, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        store = dist.PrefixStore("group/", self.store)  # the plan's key stays apart from the group's own
        if self.device.type == "cuda":
            from torch.distributed import ProcessGroupNCCL

            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = ProcessGroupNCCL(store, rank, world_size, options)
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, options)

    def post_plan(self, buckets: list[Bucket]) -> None:
        self.store.set("plan", buckets_to_json(buckets))

    def plan(self) -> list[Bucket]:
        return buckets_from_json(self.store.get("plan"))  # waits until rank 0 has posted it

    def broadcast(self, flat: torch.Tensor) -> None:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.pg.broadcast([flat], options).wait()

    def close(self) -> None:
        self.pg.shutdown()


def send_buckets(buckets: list[Bucket], tensors: Mapping[str, torch.Tensor],
                 gathered: Callable[[torch.Tensor], ContextManager], group: WeightGroup | None, device) -> None:
    """Learner side. Every learner rank walks the buckets, since ZeRO-3's gathers are collective over
    the learner ranks; the rank holding the group (rank 0) flattens each bucket and broadcasts it."""
    for bucket in buckets:
        if group is not None:
            group.broadcast(flatten(bucket, tensors, device, gathered))
            continue
        for name in bucket.names:
            with gathered(tensors[name]):
                pass


def receive_buckets(buckets: list[Bucket], group: WeightGroup) -> Iterator[tuple[str, torch.Tensor]]:
    """Engine side: (name, tensor) bucket after bucket as the broadcasts arrive. Each bucket gets a
    new buffer: vLLM's layerwise reload may hold a view until every tensor of its layer arrived."""
    for bucket in buckets:
        flat = torch.empty(bucket.numel, dtype=bucket.torch_dtype, device=group.device)
        group.broadcast(flat)
        yield from unflatten(flat, bucket)


# ---------------------------------------------------------------- inside the vLLM workers

class WeightLoader:
    """Mixed into every vLLM worker (`worker_extension_cls`); `self` is the worker."""

    def prunerl_load_safetensors(self, path: str) -> None:
        from safetensors.torch import load_file

        self.reload_weights(weights_iterator=iter(load_file(path).items()))
        self.prunerl_retie_output_head()

    def prunerl_retie_output_head(self) -> None:
        """A tied output head has no checkpoint tensor of its own, so vLLM's reload gives it back its
        old tensors: tie it to the reloaded embeddings again and redo its post-load processing (the
        CPU backend packs the head's weight for its GEMM)."""
        model = self.model_runner.get_model()
        head, embeddings = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        if getattr(model.config, "tie_word_embeddings", False) and head is not None and embeddings is not None:
            head.tie_weights(embeddings)
            head.quant_method.process_weights_after_loading(head)

    def prunerl_device_type(self) -> str:
        return self.device.type

    def prunerl_join_weight_group(self, address: str, port: int, first_rank: int, world_size: int, host: str,
                                  timeout_s: float) -> None:
        """Join the collective transport's group as rank `first_rank` + this worker's rank in its engine."""
        self.prunerl_leave_weight_group()
        group = WeightGroup(address, port, first_rank + self.rank, world_size, timeout_s, self.device, host)
        self._prunerl_weights = (group, group.plan())

    def prunerl_receive_weights(self) -> None:
        # All buckets stream through ONE reload: each reload_weights call first sets every layer
        # aside and repacks a layer once all its checkpoint tensors arrived; a reload per bucket
        # would leave a layer whose tensors straddle two buckets (q/k/v, gate/up, weight/bias)
        # half-loaded.
        group, buckets = self._prunerl_weights
        received = receive_buckets(buckets, group)
        self.reload_weights(weights_iterator=received)
        for _ in received:  # every member takes part in every broadcast, whatever the loader read
            pass
        self.prunerl_retie_output_head()

    def prunerl_leave_weight_group(self) -> None:
        weights = getattr(self, "_prunerl_weights", None)
        if weights is not None:
            weights[0].close()
        self._prunerl_weights = None


# ---------------------------------------------------------------- file transport

class FileTransport:
    """Safetensors file on a filesystem both sides can read (one node, or a shared mount)."""

    name = "file"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> str:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"weights-{version}.safetensors"
        with publish_file(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
        for old in self.directory.glob("weights-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
        return str(path)

    @staticmethod
    def receive(llm, handle: str, timeout_s: float) -> None:
        llm.collective_rpc("prunerl_load_safetensors", timeout=timeout_s, args=(handle,))


TRANSPORTS = {"file": FileTransport}


# ---------------------------------------------------------------- the controller's handle

class WeightSync:
    """Brings the learners' weights into the rollout engines: `push(version)` after each optimizer
    step, `close()` at the end. `cfg` is the stage's `rollout.weight_sync`.

    `file`: learner rank 0 publishes a file and every engine reloads it; a replaced engine reloads
    the last file (RolloutGroup.load_weights).

    `collective`: the group (learner rank 0 + every vLLM worker) is formed on the first push and
    formed again whenever the engines it was formed with are not the ones a push goes to. A push
    runs the learner ranks' send and the engines' receive concurrently and waits on all of them
    under `cfg.timeout_s` (RolloutGroup.sync_weights). A replaced engine gets its weights from a
    push into the replacements alone (a group of learner rank 0 and them: the other engines may be
    generating), and the next push forms the full group again. The learners' weights are the
    latest pushed ones (one-step-off: possibly one version newer, so that engine's samples are
    fresher than recorded, never staler). A push that fails part-way leaves every receiver
    half-loaded, so after the engines at fault are replaced, it is repeated into the others.
    """

    def __init__(self, cfg, learners, rollout, directory: str | os.PathLike):
        self.cfg, self.learners, self.rollout, self.directory = cfg, learners, rollout, str(directory)
        self.members: list | None = None  # the engine actors of the formed group, in rank order

    def push(self, version: int) -> None:
        if self.cfg.transport == "file":
            handle = self.learners.call("publish_weights", "file", self.directory, version)[0]
            self.rollout.load_weights("file", handle, self.cfg.timeout_s)
        else:
            self.rollout.sync_weights(self._broadcast)

    def _broadcast(self, indices: list[int]) -> None:
        engines = [self.rollout.workers[i] for i in indices]
        names = [self.rollout.names[i] for i in indices]
        try:
            if self.members != engines:
                self._form_group(engines, names)
            timeout = self.cfg.timeout_s + GRACE_S
            self._wait([w.send_weights.remote() for w in self.learners.workers],
                       [e.receive_weights.remote(timeout) for e in engines], names,
                       "weight sync")
        except BaseException:
            self.members = None  # a group that broke off is formed again
            raise

    def _form_group(self, engines: list, names: list[str]) -> None:
        import ray

        from rl.liveness import gather

        hosts, devices = zip(*self._wait([], [e.weight_group_member.remote() for e in engines], names,
                                         "weight sync (engine members)"))
        one_node = len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 1
        address, port = gather([self.learners.workers[0].rendezvous.remote(one_node)], ["learner rank 0"],
                               "weight sync (rendezvous)", self.cfg.timeout_s)[0]
        first = list(accumulate((len(d) for d in devices), initial=1))  # each engine's first rank: 0 is the learner
        world, timeout = first[-1], self.cfg.timeout_s + GRACE_S
        self._wait([w.open_weight_group.remote(address, port, world, devices[0][0], self.cfg.bucket_mb, timeout)
                    for w in self.learners.workers],
                   [e.worker_rpc.remote("prunerl_join_weight_group", address, port, first[i], world,
                                        "127.0.0.1" if one_node else hosts[i], timeout, timeout_s=timeout)
                    for i, e in enumerate(engines)], names, "weight sync (forming the group)")
        self.members = engines

    def _wait(self, learner_refs: list, engine_refs: list, engine_names: list[str], what: str) -> list:
        """Engine results (then learner results) or a fail-fast `WorkerFailure` naming who did not
        answer: an engine that never joins leaves learner rank 0 waiting too, so both are named."""
        from rl.liveness import gather

        names = engine_names + [f"learner rank {r}" for r in range(len(learner_refs))]
        return gather(engine_refs + learner_refs, names, what, self.cfg.timeout_s, probe=self.rollout.dead_engines,
                      probe_interval_s=self.rollout.liveness.probe_interval_s)

    def close(self) -> None:
        """Leave the collective group (best effort: this also runs while a failed stage shuts down)."""
        import ray

        if self.members is None:
            return
        refs = ([w.close_weight_group.remote() for w in self.learners.workers]
                + [e.worker_rpc.remote("prunerl_leave_weight_group") for e in self.members])
        ray.wait(refs, num_returns=len(refs), timeout=10)
        self.members = None
