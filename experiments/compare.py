"""Linear vs nonlinear fine-tuning sweep (shots × methods × seeds); pretrains missing source models.

  python -m experiments.compare --config configs/compare_mnist.py --workdir /tmp/lqf_demo
"""


from lqf import cli, compare

if __name__ == "__main__":
  cli.launch(compare.run)
