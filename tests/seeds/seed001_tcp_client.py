# Seed 001's TCP client (../shared/seeds/001, "基于socketserver模块实现并发tcp"),
# as written there, with the server address taken from the command line
# instead of ('127.0.0.1', 8080). It reads lines from stdin until EOF.
import sys
from socket import *

host, port = sys.argv[1], int(sys.argv[2])

client=socket(AF_INET,SOCK_STREAM)
client.connect((host,port))
while True:
    try:
        msg=input(">>: ").strip()
    except EOFError:  # the seed loops forever; a test's stdin ends
        break
    if len(msg) == 0:
        continue
    client.send(msg.encode('utf-8'))
    data=client.recv(1024)
    print(data.decode('utf-8'))
