"""safeq-lab: an emulator of a YSoft SafeQ 6 print-management network for firewall testing."""
