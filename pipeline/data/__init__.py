"""The data a model learns from: captioned images, and the image features stored once for every stage.

  annotations  KTVIC's layouts, read into image records; the captions' text as every stage sees it
  features     the HDF5 feature store: one file per split, one row per image
  chunks       extraction in resumable chunks, shared out among torchrun's processes
"""
