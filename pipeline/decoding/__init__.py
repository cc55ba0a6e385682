"""Turning image features into captions.

  beam       batched beam search on the model's decoding state; captions for a split's features
  sampling   captions drawn from the model's distribution (self-critical training's samples)
  inference  captioning new image files with a trained model and the encoder it was trained on
"""
