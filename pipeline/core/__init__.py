"""What every other package stands on, and which imports nothing of viclip's above it.

  config       typed, strict params.yaml
  errors       the one exception the CLI turns into a one-line message
  io           atomic writes
  devices      which device, at which precision
  distributed  many processes, one result (torchrun)
  registry     the feature stores and the models by name: the one list of each
  paths        where each stage writes
"""
