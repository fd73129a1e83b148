"""llmconsole.console"""
