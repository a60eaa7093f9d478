"""Seed 002's UDP group-chat server (the version with heartbeats), headless.

The code of ChatUDPServer is the tutorial's own (../shared/seeds/002_*.txt),
unchanged but for two things needed to run it unattended in a benchmark:
the address comes from the command line, and instead of waiting for `quit`
on stdin, SIGINT/SIGTERM call stop(). Its per-message logging is kept: it
is part of what that server costs.

    python3 seed002_server.py 127.0.0.1 9999
"""
import socket
import threading
import datetime
import logging
import signal
import sys

FORMAT = "%(asctime)s %(threadName)s %(thread)d %(message)s"
logging.basicConfig(format=FORMAT, level=logging.INFO)


class ChatUDPServer:
    def __init__(self, ip='127.0.0.1', port=9999, interval=10):
        self.addr = (ip, port)
        self.sock = socket.socket(type=socket.SOCK_DGRAM)
        self.clients = {}  # 记录客户端，改为字典
        self.event = threading.Event()
        self.interval = interval  # 默认10秒，超时就要移除对应的客户端

    def start(self):
        self.sock.bind(self.addr)  # 立即绑定
        # 启动线程
        threading.Thread(target=self.recv, name='recv').start()

    def recv(self):
        while not self.event.is_set():
            localset = set()  # 清理超时
            data, raddr = self.sock.recvfrom(1024)  # 阻塞接收数据

            current = datetime.datetime.now().timestamp()  # float
            if data.strip() == b'^hb^':  # 心跳信息
                print('^^^^^^hb', raddr)
                self.clients[raddr] = current
                continue
            elif data.strip() == b'quit':
                # 有可能发来数据的不在clients中
                self.clients.pop(raddr, None)
                logging.info('{} leaving'.format(raddr))
                continue

            # 有信息来就更新时间
            # 什么时候比较心跳时间呢？ 发送信息的时候，反正要遍历一遍
            self.clients[raddr] = current

            msg = '{}. from {}:{}'.format(data.decode(), *raddr)
            logging.info(msg)
            msg = msg.encode()

            for c, stamp in self.clients.items():
                if current - stamp > self.interval:
                    localset.add(c)
                else:
                    self.sock.sendto(msg, c)  # 不保证对方能够收到
            for c in localset:
                self.clients.pop(c)

    def stop(self):
        for c in self.clients:
            self.sock.sendto(b'bye', c)
        self.sock.close()
        self.event.set()


def main():
    ip = sys.argv[1] if len(sys.argv) > 1 else '127.0.0.1'
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 9999
    cs = ChatUDPServer(ip, port)
    cs.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    cs.stop()
    sys.stdout.flush()
    # The recv thread is blocked in recvfrom on a closed socket.
    import os
    os._exit(0)


if __name__ == '__main__':
    main()
