"""The ``lit-align`` commands besides LightningCLI's ``fit``/``validate``/``test``, one module each."""
