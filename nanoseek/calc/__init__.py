"""Calculators that read only configs: parameters, KV-cache memory, FLOPs, serving capacity;
and arithmetic expressions without eval (arithmetic.py: the agent's calculator tool, the
rewards' checker of an answer)."""

from nanoseek.calc.capacity import Assumptions, CapacityPlan, plan_capacity
from nanoseek.calc.flops import FlopsReport, attention_flops_per_token, flops_report
from nanoseek.calc.gpus import GPU, GPUS, get_gpu, register_gpu
from nanoseek.calc.kv import kv_bytes_per_token, kv_table
from nanoseek.calc.params import ParamCount, count_params, matmul_params

__all__ = ["Assumptions", "CapacityPlan", "plan_capacity", "FlopsReport", "attention_flops_per_token",
           "flops_report", "GPU", "GPUS", "get_gpu", "register_gpu", "kv_bytes_per_token", "kv_table",
           "ParamCount", "count_params", "matmul_params"]
