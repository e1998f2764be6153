"""x86-64 platform: guest memory layout, CPUID policy, MSRs, CPU entry state."""
