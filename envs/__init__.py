"""Gymnasium environments over the mHC gates of a frozen model (envs/mhc_env.py) and the GSM8K-format problem
logic they use (envs/gsm8k_env.py). Importing the package registers `nanochat/GSM8KMHC-v0` with gymnasium."""
from envs.mhc_env import ENV_ID, register

register()

__all__ = ["ENV_ID"]
