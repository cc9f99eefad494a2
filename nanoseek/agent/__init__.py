"""The agent (DESIGN.md §6): a tool-calling loop over any OpenAI-compatible endpoint.

loop.py (Agent) drives; tools/ holds the tools and the toolbox that turns every failure into
an observation; sandbox.py runs untrusted Python; budget.py, memory.py and guards.py keep
the run bounded; trajectory.py records it; tool_parser.py reads DeepSeek-V3's tool-call
markers (also for nanoseek's server); text_protocol.py is the fallback for endpoints
without native tools. Importing this package imports neither torch nor openai.
"""

from nanoseek.agent.budget import ContextBudget
from nanoseek.agent.guards import Guards
from nanoseek.agent.loop import Agent
from nanoseek.agent.trajectory import Trajectory

__all__ = ["Agent", "ContextBudget", "Guards", "Trajectory"]
