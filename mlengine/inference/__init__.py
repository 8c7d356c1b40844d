"""Inference: the sentence encoder, the classifier heads and the virality model, and the
stage that labels every event with them (the ``inference`` queue).

- ``encoder`` (with ``quantized``, its int8 ONNX graph): all-MiniLM-L6-v2 sentence vectors.
- ``heads``, ``finetune``, ``training``: the classifier heads, trained, registered and
  served.
- ``virality_features``, ``virality_model``, ``virality_training``: virality at posting
  time: the label and features, the model and its scores, its training and evaluation.
- ``scoring``: the stage: the transformer labels and virality scores of new events.
"""
