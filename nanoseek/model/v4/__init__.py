"""DeepSeek-V4 (report: "DeepSeek-V4: Towards Highly Efficient Million-Token Context Intelligence"): hybrid compressed attention, hyper-connections, hash-routed MoE."""
