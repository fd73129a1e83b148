"""llmconsole.core.models"""
