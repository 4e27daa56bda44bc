"""Generated tasks with verifiable answers, for RL on rewards computed by a program (the grpo stage).

Each task module builds its data in the project (nothing is downloaded) and writes jsonl rows with a
`prompt` and the fields its reward functions read (see minirlhf/rewards.py).
"""
