"""llmkit.compress"""
