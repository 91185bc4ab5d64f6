"""Models: MoE family adapters (tensor names, layouts, routers) and running a model for calibration."""
