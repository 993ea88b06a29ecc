"""Fine-tunes a pretrained checkpoint on a target task with one method (LQF or a baseline).

  python -m experiments.finetune --config configs/finetune_mnist.py:method=lqf,shots=5 --workdir W
"""


from lqf import cli, finetune

if __name__ == "__main__":
  cli.launch(finetune.run)
