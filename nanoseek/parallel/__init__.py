"""Training on many processes with torch.distributed (DESIGN.md §4).

One `DeviceMesh` lays the processes out as (pp, dp, tp) for dense weights and, over the
same ranks, as (pp, dp/ep, ep, tp) for the routed experts (torchtitan's layout: expert
parallelism borrows its ranks from data parallelism, so the ranks of one EP group see
different tokens and exchange them with all-to-all):

  * mesh.py            the process group (NCCL on GPUs, gloo on CPU, with timeouts) and the mesh;
  * data_parallel.py   FSDP2 `fully_shard` of the dense weights over dp (experts left out;
                       under PP and for GRPO the weights are replicated instead, runtime.py);
  * expert_parallel.py each rank keeps n_routed_experts/ep experts; token-slots travel with
                       `all_to_all_single` after the split sizes are exchanged, autograd included;
  * tensor_parallel.py DTensor `parallelize_module`: MLA's q_b/kv_b column-wise by heads,
                       o_proj row-wise, the dense FFN column/row-wise;
  * pipeline.py        torch.distributed.pipelining, Schedule1F1B over the step's micro-batches
                       (one pipeline per DP rank: pp composes with dp, ep and tp);
  * placement.py       which rank owns which expert group, the node-limited routing bound and
                       what a step's dispatch actually cost;
  * runtime.py         `Parallel`: what the training loop asks of the processes (global
                       target counts, summed metrics and loads, the global gradient norm);
  * sharded_state.py   the training state sharded with torch.distributed.checkpoint, resumable
                       on another number of processes, consolidated into an HF directory;
  * rl.py              GRPO's data parallelism: each rank its share of the prompts and rollouts;
  * launch.py          `nanoseek pretrain|sft|grpo --nproc N` (starts torchrun) and the entries.
"""

from nanoseek.parallel.mesh import ParallelConfig

__all__ = ["ParallelConfig"]
