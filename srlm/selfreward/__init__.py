"""The self-rewarding loop: self-instruction creation (new prompts, candidates, self-judging,
preference pairs) and the DPO rounds that train M_{t+1} from M_t.

Kept import-free so that the pure helpers (scoring, prompt_filter, pairs) load without torch.
"""
