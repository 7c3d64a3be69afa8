"""llmkit.agent"""
