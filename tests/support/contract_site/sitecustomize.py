"""Puts every Python process started with this folder on PYTHONPATH under the NCCL contract.

tests/support/launch.py adds this folder to PYTHONPATH for the torchrun launches of the real training
script, so those processes refuse what NCCL refuses (see tests/support/nccl_contract.py), exactly like the
spawned test worlds of tests/support/distributed.py. Only test launches ever see this file.
"""
import os

if os.environ.get("TANDEM_NCCL_CONTRACT") == "1":
    from tests.support.nccl_contract import install

    install()
