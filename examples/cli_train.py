"""Train the GPT with LightningCLI, everything (plugin, callbacks, data) from YAML.

python examples/cli_train.py fit --config examples/configs/cli_fpq.yaml
python examples/cli_train.py fit --config examples/configs/cli_fpq.yaml --trainer.max_steps=50
"""

from lightning.pytorch.cli import LightningCLI

from lightning_fpq.demo.data import ByteCorpusDataModule
from lightning_fpq.demo.model import GPTLightning


def main() -> None:
    LightningCLI(GPTLightning, ByteCorpusDataModule, save_config_callback=None)


if __name__ == "__main__":
    main()
