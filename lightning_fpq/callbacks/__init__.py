"""Lightning callbacks: token counting, CriticalDataMonitor, ProgressivePrecision."""
