"""llmkit.serve"""
