"""Where instances come from: Pods, Nodes and Instance custom resources."""
