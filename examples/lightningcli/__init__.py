"""Configuring the callbacks from LightningCLI YAML: a two-source regression trained with patterning.

python -m examples.lightningcli fit --config examples/lightningcli/config.yaml
"""
