"""ragkit's evaluation suites: needle-in-a-haystack, lost-in-the-middle, regression jobs."""
