"""What a run leaves for a person to look at: curves (``curves.py``) and model cards (``model_card.py``)."""
