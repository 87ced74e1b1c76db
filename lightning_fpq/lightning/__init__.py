"""The only part of lightning-fpq that imports Lightning: the precision plugin and the callbacks
(token counting, the critical-data monitor, progressive precision)."""
