"""What two or more HelixNet Core components use: settings, the event store, events."""
